"""Online serving: the API, the model holder that follows a registry alias, traffic policy, prediction log."""
