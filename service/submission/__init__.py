"""Handing audits to Ray: the submitter interface, its local-Ray and Ray-Jobs implementations (picked in
`factory`), the driver records and the orphan watch. Imports `service.settings` only."""
