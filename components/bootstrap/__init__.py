"""Components of the bootstrap stack, one per concern."""
