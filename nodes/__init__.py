"""ComfyUI nodes of the AcT pack (thin glue over the `act` library)."""
