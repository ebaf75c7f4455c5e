"""Models (VGG family, small test networks) and the graph walk that binds symmetries to their tensors."""
