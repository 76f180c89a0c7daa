"""Request body -> images -> uint8 pixels at the model's input size (front-end processes, no torch)."""
