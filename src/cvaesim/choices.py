"""The simulator's choices by name, free of TensorFlow, so that the command line offers them
(and answers --help) without loading it."""

LIBRARY_SIZES = ("resampled", "paired", "decoded")
LATENT_DRAWS = ("prior", "posterior")
CALIBRATIONS = ("none", "type_means", "type_moments", "type_quantiles")
ORIGINS = ("balanced", "independent")
