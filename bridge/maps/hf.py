MAPS = []
