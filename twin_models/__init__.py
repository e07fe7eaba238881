"""What both backends share and neither framework needs: the preset table (`twin_models.presets`),
the word tokenizer (`twin_models.tokenizer`) and the framework-free math of the models
(`twin_models.model_math`). Importing it changes no global state."""
