"""The API's routers, one file per group of routes."""
