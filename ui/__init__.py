"""LDM Studio's browser interface (Gradio). Imports ``ldm``; ``ldm`` never imports this package."""
