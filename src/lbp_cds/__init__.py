"""lbp-cds: a CDS Hooks 2.0 service for low back pain radiating to the leg."""
