"""Studies of trained or initialised models (each module is also a `python -m` program).

`gradient_flow`: per-HEM-layer gradient magnitudes and the ELBO per iteration (Fig. 3).

Importing a study module pulls in neither TensorFlow nor matplotlib: the programs load them
when they read data or draw.
"""
