"""Training-data synthesis and preparation scripts for StackMFF-V2."""
