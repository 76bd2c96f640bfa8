"""ALFWorld text games: the official alfworld/TextWorld engine on procedurally generated games.

`env.AlfWorldEnv` is the environment (id "alfworld"); `generator` draws ALFRED-domain PDDL
problems, `games` caches them on disk and finds official games, `engine` drives TextWorld.
"""
