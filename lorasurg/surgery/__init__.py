"""One module per offline operation; each composes io + engine and returns a report object."""
