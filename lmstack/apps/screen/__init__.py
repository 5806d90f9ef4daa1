"""The two-stage risk screen (seed 002): an int8 encoder classifier scores every payment; only its uncertain band
goes to the LLM for a JSON-schema verdict. ``lmstack run recipes/screen.yaml``; docs/screen.md."""
