"""An example user package with its own model, served by modelhost through an entry point."""
