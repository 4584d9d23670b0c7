"""Process groups and the autograd-aware collectives. `comm` is the only module that calls torch.distributed."""
