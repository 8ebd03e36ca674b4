"""The model: its architectures and training, and what every user of a trained model shares (`inference`)."""
