ALTER TABLE customers DROP COLUMN country;
