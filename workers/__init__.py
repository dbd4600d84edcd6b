"""The audit pipeline on Ray, importing `dfc` and never `service`: `spec` describes an audit; `storage` <
`activations` < `pipeline` < `analysis` < `report` are its layers; `planted` builds the demo's ground-truth pair."""
