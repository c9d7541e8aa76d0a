"""The primitives, one family per module. Import them from the flat ``gradtx`` namespace."""
