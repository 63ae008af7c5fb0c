"""Protocol translation, pure (no Flask, no torch): request shapes in, engine jobs out, response
shapes back. Every handler takes a ServingContext and a parsed JSON body."""
