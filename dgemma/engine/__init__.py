"""Generation: the stepped engine (engine.py) with its compiled pieces (compiled.py), the one-shot entry points and
the reference loops they are tested against (generate.py), compat mode's static cache and the chunked sampler
(static.py), what a generation returns (outputs.py) and recorded trajectories (trajectory.py)."""
