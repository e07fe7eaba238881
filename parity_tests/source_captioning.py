"""The second source document's `ImageCaptioningModel` (section 5, "Image Captioning"), verbatim.

The specification as code: the tests load its state dicts into `torch_reference.captioning` with
`strict=True` and hold our cached decode to its uncached `generate_caption`. Not part of the library.
"""

import torch
import torch.nn as nn


class ImageCaptioningModel(nn.Module):
    def __init__(self, image_encoder, text_decoder):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_decoder = text_decoder
    
    def forward(self, images, captions):
        # Encode image
        image_features = self.image_encoder(images)
        
        # Decode with cross-attention to image
        outputs = self.text_decoder(
            input_ids=captions,
            encoder_hidden_states=image_features
        )
        
        return outputs.logits
    
    def generate_caption(self, image, max_length=50):
        """Generate caption for image."""
        image_features = self.image_encoder(image.unsqueeze(0))
        
        # Start with [BOS] token
        generated = torch.tensor([[self.text_decoder.config.bos_token_id]])
        
        for _ in range(max_length):
            outputs = self.text_decoder(
                input_ids=generated,
                encoder_hidden_states=image_features
            )
            
            next_token = outputs.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            generated = torch.cat([generated, next_token], dim=1)
            
            if next_token.item() == self.text_decoder.config.eos_token_id:
                break
        
        return generated
