"""The service face, importing `workers` (spec, status, storage, report) and never torch: `settings` <
`submission` < `screening` < `api` < `cli`, each importing only the ones before it."""
