"""The job language, pure: models and parsing, filters, values, the compiler."""
