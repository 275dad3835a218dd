"""Package data, no code: the checkpoints shipped with morserve, one folder each. Wheels and sdists
install this folder as the package `morserve_models` (setup.py); morserve.checkpoint.pretrained
finds it there, or here in a source checkout."""
