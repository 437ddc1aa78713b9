"""A small shop: orders publish ``OrderPlaced``; billing and e-mail handle it.

See examples/README.md for running it against the services of docker-compose.yml.
"""
