"""Stage 5 of the pipeline: report. Renders results files; never imports torch."""
