"""Networks: each maps tensors to tensors and holds only layers (no schedule, no device choice)."""
