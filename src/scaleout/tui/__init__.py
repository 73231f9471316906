"""The Textual app of `scaleout tui` (imported only when it runs: Textual is heavy)."""
