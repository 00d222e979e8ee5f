"""Fine-tuning engines (ReFL, ImageReFL, SQDF). Not built yet: see the README's status table."""
