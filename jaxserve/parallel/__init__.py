"""Device meshes and sharding: tensor parallelism inside a replica, data parallelism across them."""
