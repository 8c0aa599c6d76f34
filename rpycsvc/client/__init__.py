"""The client side: connections, the cluster and its jobs, map/map_reduce, futures, output,
local servers."""
