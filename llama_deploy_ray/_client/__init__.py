"""What runs in a user's process to talk to a core over HTTP: the clients and their sans-I/O
core."""
