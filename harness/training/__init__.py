"""One trial: the recipe (trial.run_recipe), its Backend interface and local backend, the one
training loop, batching, the sanity checks every trial runs, memory measurement, adapter
artifacts and the forgetting measurement."""
