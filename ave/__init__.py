"""AVE: the control plane of device test labs."""
