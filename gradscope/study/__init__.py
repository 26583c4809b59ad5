"""The claim check: the paper's runs (configs x seeds x steps), the claims decided from them, and user models."""
