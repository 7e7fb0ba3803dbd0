"""Weight conversion between snapfusion's layouts and foreign ones (diffusers folders, original LDM checkpoints)."""
