"""clerk-sync: keep your SQL users/organizations in step with Clerk."""
