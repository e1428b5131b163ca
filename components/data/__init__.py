"""The data family: contracts, the synthetic world, MovieLens import and the validation gate."""
