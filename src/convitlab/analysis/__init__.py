"""What the model does, measured: how local each head attends (locality.py), its attention maps
(attention_maps.py), parameters and FLOPs (summary.py)."""
