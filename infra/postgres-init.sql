-- A second database for the MLflow server (Airflow uses the default "airflow" one).
CREATE USER mlflow WITH PASSWORD 'mlflow';
CREATE DATABASE mlflow OWNER mlflow;
