"""Data: tables of (prompt, response, category) records, calibration batches for attribution,
and loaders for the datasets the method uses."""
