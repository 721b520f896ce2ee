"""Deployment artifacts: safetensors + quant_model_description JSON (MindIE-style), numpy dicts, and their readers."""
