"""The ``dfc-audit`` command line: ``main`` parses and dispatches, ``run`` runs audits and the demo here,
``common`` holds what both share. Imports go main → run → common, never back."""
