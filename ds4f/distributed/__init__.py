"""⑦ distributed: tensor parallelism across processes and nodes (groups, sharding hooks, executor, launch)."""
