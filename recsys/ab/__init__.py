"""A/B testing: deterministic assignment, the exposure log, analysis and validation by simulation.

Modules (imported explicitly; importing the package is cheap and framework-free)::

    recsys.ab.assignment    Assigner, bucket: salted-hash assignment of users to variants
    recsys.ab.exposure_log  ExposureLogWriter, read_exposures, VariantRouter (for the serving layer)
    recsys.ab.analysis      analyze (``recsys ab analyze``), plan_sample_size, power_two_proportions
    recsys.ab.simulation    simulate_ab, simulate_aa: the synthetic marketplace's users play the users
"""
