"""Screening new Hub releases: the `dfc-audit screen` pass, the watch list and the summary it writes for
`/metrics`. Imports `service.settings` only."""
