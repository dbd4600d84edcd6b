"""Running one audit: the driver and its stage table, the first three stages, Ray actors, stage context, status
records and the training job. Later stages live in `workers.analysis` and are looked up by name when they run."""
