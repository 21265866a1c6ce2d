"""The app layer: one run session (load → quantize → measure → judge → report), its variants
(--confirm, fix verification), the run folder and the run's configuration."""
