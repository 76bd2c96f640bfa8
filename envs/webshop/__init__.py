"""WebShop-compatible text shopping: a generated catalog with BM25 search and WebShop's reward
(`env.WebShopEnv`, id "webshop"), and a client for a real WebShop server
(`client.WebShopServerEnv`, id "webshop-server") tested against `standin_server`."""
