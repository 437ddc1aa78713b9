"""An orders service on FastAPI: publishes in its endpoints, consumes in its lifespan."""
