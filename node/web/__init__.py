"""Server-rendered pages, shared by the node's provider dashboard and the gateway's console and customer page: a
Jinja2 environment that escapes everything it is given, the common layout, and charts drawn as SVG on the server."""
