"""Facts about Google Cloud and the names we give its resources: where TDX runs (zones, machine
types, with sources and dates) and every GCP name and label. Imports nothing from ``fleet``."""
